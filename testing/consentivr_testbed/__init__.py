"""consentivr's test bench: the sandboxed Asterisk PBX, the sipp caller, the demo.

Not part of the consentivr wheel: it needs root, bwrap, debootstrap and sipp, and the
repo's ``asterisk/`` templates. ``./dev setup`` installs it editable into ``.venv``.

- ``pbx``: ``SandboxPbx`` (Debian's Asterisk 22 under bwrap), ``ExternalPbx``;
  ``python -m consentivr_testbed.pbx provision|run``.
- ``sipcaller``: real SIP calls with sipp (RTP, RFC 2833 digits).
- ``testbed``: consentivr's service wired to a test PBX, in-process (``Testbed``).
- ``demo``: the three-call demo (``./dev demo``).

For in-memory fakes in your own tests, see ``consentivr.testing`` (shipped).
"""
