"""Center services: one subpackage per concern (controller, sync, alarms, ...)."""
