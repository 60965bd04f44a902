"""What each experiment runs, above the stage chain (pipeline/) and the online engine (rl/):
a typed config with its validation, and run(config) -> the result dict, writing its workdir.

  ppo, grpo (--algorithm grpo|gspo|reinforce_pp), nash_md, online_dpo   online, in rl.loop
  best_of_n                                                            sampling + scoring
  dpo (config and pair machinery), dpo_world (rater pairs on a world), dpo_files (Hugging
  Face checkpoints and local preference files, --dry_run memory plans)
  overoptimisation, grpo_sweep, sycophancy, nash_md_sweep              sweeps over seeds
  sweeps (seed lists, mean/std), plots (figures)

experiments/<name>.py is the command-line main of each (python -m experiments.<name>).
"""
