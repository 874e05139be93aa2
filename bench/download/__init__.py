"""``bench data download NAME``: a real dataset's published files, fetched and put where its loader reads.

Modules, in the order a download goes through them: :mod:`.releases` (where each dataset's files
are published, their checksums and the layout they unpack to, with the source of each fact),
:mod:`.fetch` (resumable HTTP download, checksum verification), :mod:`.install` (safe extraction
into a temporary folder next to the target, then one rename into place), :mod:`.cli` (the command,
ending with ``bench data check``). Nothing is imported here.
"""
