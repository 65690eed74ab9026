"""`deltaclip demo`: trains, registers and serves adapters on real images, end to end.

It sits above the trainer and the server (it uses both); nothing imports it."""
