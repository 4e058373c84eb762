"""What travels between services: message types, the wire codec, tensor blobs, and every Redis
stream and key name."""
