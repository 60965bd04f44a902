"""Reliability campaigns: evidence that a run survives what happens to real runs.

kill_campaign (python -m rlhf_jax.reliability.kill_campaign) SIGKILLs every stage kind's
experiment at random moments and during checkpoint saves, relaunches it, and checks the
resumed run ends bit for bit where an uninterrupted one does (docs/reliability.md). A resume
test that drops a checkpoint by hand only covers the states someone thought of; a kill at a
random moment also lands in a half-written metrics line, an orbax temporary directory, a
LOCK left behind, the window between the last save and the result files.
"""
