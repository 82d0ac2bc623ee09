"""Edge agent: one subpackage per edge concern, mirroring `services/`."""
