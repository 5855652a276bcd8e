"""The base model: where it comes from (a local folder, the embedded GGUF) and how it is loaded and quantized."""
