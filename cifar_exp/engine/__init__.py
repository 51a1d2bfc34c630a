"""Running a training job: the config checked before any work (`preflight`), the run built
(`build`), device and precision (`compute`), optimizers and schedules (`optim`, `learner`),
the loop (`loop`), inference with test-time views (`inference`), checkpoints and resume,
stop signals, profiling, run folders and the Hydra job around it all (`jobs`)."""
