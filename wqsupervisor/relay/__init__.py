"""Resumable forwarding: a relay on the head node that holds the workers' connections across sessions.

:mod:`.wire` frames, :mod:`.core` the streams (numbered, acknowledged,
replayed), :mod:`.headmain` the head's daemon and attacher, :mod:`.program`
the program sent to the head, :mod:`.peer` the agent's end.
"""
