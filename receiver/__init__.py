"""vmcast's receiver: ``vmcast receive`` takes one image off a multicast stream, writes it, and proves it.

* `cli`: the ``receive`` command (a plain function the root typer app registers) and its exit codes;
  `defaults`: the constants its options show, so that building it imports nothing else.
* `agent`: one receive orchestrated with trio (lease, target, socket, pump, progress, watchdog, signals).
* `pump`: the per-datagram loop, in one worker thread; `hashing`: the whole-image SHA-1 in another.
* `multicast`: the group socket; `target`: the output and its safety checks; `lease`: the server's API.
* `repair`: repair requests (NACKs) for lost frames; `fallback`: fetching blocks by HTTP Range instead.
* `state`: the state file beside the output; `resume`: what a re-run does with it.
* `progress`: progress on stderr; `errors`: the one root exception and the exit codes; `redaction`: secrets
  out of the messages shown.
* `verified`, `registration`: the verified-image type, and registering one into Glance or EC2;
  `registering`: ``vmcast receive --register``.
"""
