"""Wire schemas: commands, events and their envelope, registered by stable name + version."""
