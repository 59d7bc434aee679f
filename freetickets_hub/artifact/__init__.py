"""The published artifact: its file names, ``config.json``, the bit-mask codec, atomic files and Hub I/O."""
