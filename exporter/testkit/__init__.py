"""Support for tests, benchmarks and `make demo`, not imported by the product's job path.

tiny_models.py    tiny real transformers checkpoints built offline (`build_tiny("gemma4", dir)`)
dequant_load.py   an export loaded back as a BF16 transformers model through our own dequantizers,
                  to bound what quantization did to the logits without a serving engine
"""
