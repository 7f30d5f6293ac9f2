"""Evaluation: metrics, test-time augmentation, ONNX export, checkpoint inspection."""
