"""Generated from bridge/proto/snakepit_bridge.proto by bridge/generate.py; do not edit, regenerate with `make proto`."""
