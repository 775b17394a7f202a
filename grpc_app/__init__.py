"""gRPC adapter: the ``inference.InstanceDetector`` service on top of ``DetectionService``."""
