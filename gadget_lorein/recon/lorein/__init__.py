"""LoREIN: the LRR and PMR blocks (model), the joint fit (fit) and the hash-grid coordinate networks."""
