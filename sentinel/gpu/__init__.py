"""GPU memory: the NVML collector, the DenseNet memory model and the GPU self-check.

    nvml.py       the NVML interface, pynvml behind it (imported lazily), errors translated
    procfs.py     which GPU processes are the model server's (PID, name, cgroup)
    collector.py  GpuCollector / build_collector: sentinel_gpu_* on each scrape
    memory.py     DenseNet weights, peak activations, largest batch that fits (no torch)
    measure.py    measured peaks (CPU profiler events, CUDA allocator) to check memory.py
    selfcheck.py  the one-shot check on a real GPU (scripts/gpu_check.sh)

Importing this package or `collector` does not import torch or pynvml.
"""
