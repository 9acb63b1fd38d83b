"""FleetLock: the HTTP reboot-lock protocol of Fedora CoreOS's Zincati, served from our etcd
semaphore and policies (docs/fleetlock.md).

- :mod:`.protocol`: the wire format (header, body, error kinds), no I/O;
- :mod:`.service`: pre-reboot and steady-state as etcd transactions (windows, pause, cooldown,
  FIFO place in line, overdue holders, audit);
- :mod:`.server`: the aiohttp server (limits, auth, TLS, metrics, readiness);
- :mod:`.config`: the server's TOML config, airlock's format plus ours;
- :mod:`.airlock`: airlock's ``[lock]`` slots written as policies.
"""
