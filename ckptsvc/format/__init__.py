"""The bytes on disk, torch-free: safetensors headers, the HF index and file names, the
manifest, bounded JSON documents, CRC-32C, the files ``save_pretrained`` writes besides
weights. Imports only ``errors``, ``knobs``, ``version`` and ``storage``."""
