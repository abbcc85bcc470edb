"""The bench harness behind `thanos-deploy bench`. It imports the library (and what the library
shares with it: measure.py, plots.py); nothing in the library imports it.

- plan.py       the runs `--plan` builds from one model (default plan, plan files), through oneshot.Sweep
- artifacts.py  what can be measured (checkpoints, ONNX folders, TensorRT plans) and on which backend
- timing.py     the grid, the interleaved schedule, the statistics, peak memory
- report.py     the tables and the Markdown
- run.py        the pipeline: artifacts → backends → measurements → files

One-off studies live in bench/studies/ at the top of the repository (scripts, not part of the package).
"""
