"""``hvdllm plan``: measure the machine, predict every parallel layout's step time and memory, rank them."""
