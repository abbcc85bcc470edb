"""The bench harness behind `thanos-deploy bench`, installed as `thanos_deploy.bench`:

- plan.py       the runs `--plan` builds from one model (default plan, plan files)
- artifacts.py  what can be measured (checkpoints, ONNX folders, TensorRT plans) and on which backend
- timing.py     the grid, the interleaved schedule, the statistics, peak memory
- report.py     the tables and the Markdown; plots.py the PNGs
- run.py        the pipeline: artifacts → backends → measurements → files

One-off studies live in bench/studies/ (scripts, not part of the package).
"""
