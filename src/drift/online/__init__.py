"""The online multi-turn RL arm (`drift online`): group-relative advantages on fresh samples of the
current policy, through drift's own rollout engine, return function and loss."""
