"""The rollout simulator behind ``locksmithctl simulate`` and ``make demo`` (docs/simulation.md).

A fleet of simulated hosts, each the production update agent and reboot coordinator
(``updateagent.daemon.build_agent``) on its own GPT image, against a real etcd, with a real
release on a local HTTP channel, in virtual time; an independent watcher checks the safety
properties. This package imports ``updateagent``, which imports ``locksmith``: ``locksmith`` reaches
it only lazily (``locksmith/cli/simulate.py``, ``locksmith/demo.py``).
"""
