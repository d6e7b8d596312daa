"""One small module per external system. Each imports its Google client lazily, on first use."""
