"""The demo and the experiment: real data, the stock trainer and CLIP Benchmark, end to end.

emoji_data / clipart_data build the data sets, cells says what trains, runner runs cells as child processes,
report / experiment_report write what they found, app is the `superclip demo` command.
"""
