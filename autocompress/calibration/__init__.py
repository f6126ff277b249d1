"""Calibrate a hardware profile on this machine: build model files, measure them, hand the timings to the fit.

``onnx.calibrate_local`` times chains of linears and a small KV-cache decoder in onnxruntime CPU;
``llamacpp.calibrate_llamacpp`` writes GGUF files of a model and times them with llama-bench. Both
build and measure here (they use the compression, export and runtime packages); the fits that turn
the timings into profile fields, and the profiles themselves, are ``autocompress.hardware``'s, which
imports none of those packages.
"""
