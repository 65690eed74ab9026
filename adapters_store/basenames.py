"""The shipped bases' names, importable without torch (the CLI lists commands without it)."""

TINY = ("deltaclip-tiny", "random")
EFFLITE0 = ("deltaclip-efflite0", "imagenet")
