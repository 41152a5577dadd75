"""The Gadgetron node: the gadget (acquisitions in, map images out), its passive listener and the replay client."""
