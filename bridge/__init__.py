"""The gRPC wire contract (``proto/snakepit_bridge.proto``) and the tool that turns it into Python stubs."""
