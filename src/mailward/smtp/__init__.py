"""The sans-IO SMTP engine: bytes in, typed events out; decisions in, bytes out.

Nothing here imports asyncio, ssl, socket or the queue, so the same engine serves the inbound
listeners, outbound delivery and `mailward check`, and a server engine and a client engine can be
wired back to back in a unit test. It is written by hand because it is the heart of the product:
every byte of every message passes through it, and its exact handling of line endings, STARTTLS
buffers and limits is where MTAs get smuggling and injection bugs.
"""
