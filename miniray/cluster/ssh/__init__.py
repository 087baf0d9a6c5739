"""Workers on machines you can ``ssh`` into (``SSHCluster``), with nothing else open on them.

Per host, in parallel (cluster.py drives it, checklist.py records each step for the widget)::

    hosts.py      "me@gpu1:2222=8" -> NodeConfig (also what miniray.channels.Cluster takes)
    connect.py    paramiko, the way OpenSSH would: ~/.ssh/config, agent, keys, known_hosts;
                  commands under a pty that die with the session; the reverse tunnel
    preflight.py  the host's Python, cloudpickle and miniray against this one's
                  (install=True: a venv with a wheel of this checkout)
    cluster.py    server on loopback <- tunnel <- ``miniray worker`` (hosts.remote_main reads
                  the URL from stdin, echo off) -> first heartbeat -> ready

The server never leaves loopback, and its password is on no command line and in no log.
"""
