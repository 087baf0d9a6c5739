"""How arguments and results travel between a client and its task processes, by size and place.

A value (a chunk's arguments, a task's result) is pickled with protocol 5; its out-of-band
buffers (a numpy array's memory) of 1 MiB or more travel apart from the message, and what
travels in their place is a small reference. Everything else stays inline in the message: a
chunk's payload in ``tasks:{job}``, a result message in ``res:{client}``::

    sender (client or task process)                               receiver
    value --pickle 5--> message + big out-of-band buffers
      buffer, both on one machine --> /dev/shm file   (shm.py) ---> mapped: no copy, no server
      buffer, across machines ------> big:{job}:{id}  (bigvalues.py) -> parts read into one buffer
      the rest ---------------------> inline in the message
    message
      small result, client on this machine --> its unix socket (inbox.py) ---> client
      otherwise --> through the server, within its limits (payloads.py) ---> reader

- ``shm``: shared memory on one machine (``MINIRAY_SHM``, ``MINIRAY_SHM_MIN_BYTES``), and who
  frees each file.
- ``bigvalues``: big buffers stored in parts in ``big:{job}:{id}`` keys, read back with
  ``resp.Connection.fetch_into``; who deletes each key.
- ``inbox``: a small result message (up to ``inbox.MAX_MESSAGE``) straight to its client's
  unix socket when both are on the same machine, in one hop instead of two.
- ``payloads``: the server's limits: how big one field may be (big payloads go in parts) and
  whether a payload fits in its free memory at all.
"""
