"""The cached stage chain below every online and offline run: typed configs parsed from
flagfiles (config.py), the language-modelling stages (lm.py: pretrain.py, sft.py), the reward
stages (reward.py: Bradley-Terry models and ensembles; pairwise.py: a pairwise preference
model), the stage cache (stages.py) and the explicit graph that ties them (chain.py); worlds.py
derives a run's world from its flags."""
