"""The online-RL engine: one loop for every online algorithm.

  rollout.py     prompts -> samples (shared-prefix groups) -> per-token quantities (Experience)
  scorers.py     rewards of an Experience: reward models/ensembles, verifiers, penalties;
                 pairwise judges for algorithms that compare two responses
  algorithms/    what turns scored experience into train rows and a loss_fn: PPO, the group
                 family (GRPO / Dr. GRPO / RLOO / DAPO), GSPO, REINFORCE++, ...
  loop.py        the loop: resume, compile counting, minibatch epochs, eval, logging,
                 checkpointing, progress
  evaluation.py  held-out sampling with fixed keys and the tables built from it
"""
