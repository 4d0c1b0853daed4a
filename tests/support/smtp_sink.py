"""A real SMTP server for the tests (aiosmtpd): every message it receives is
written to <dir>/<n>.eml. Usage: smtp_sink.py PORT DIR. Prints READY when listening."""
import asyncio
import itertools
import pathlib
import sys

from aiosmtpd.controller import Controller


class Sink:
    def __init__(self, folder: pathlib.Path):
        self.folder = folder
        self.counter = itertools.count(1)

    async def handle_DATA(self, server, session, envelope):
        name = self.folder / f"{next(self.counter):06d}.eml"
        tmp = name.with_suffix(".tmp")
        header = "X-Envelope-To: " + ", ".join(envelope.rcpt_tos) + "\r\n"
        tmp.write_bytes(header.encode() + envelope.content)
        tmp.rename(name)
        return "250 OK"


def main():
    port, folder = int(sys.argv[1]), pathlib.Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    controller = Controller(Sink(folder), hostname="127.0.0.1", port=port)
    controller.start()
    print("READY", flush=True)
    try:
        asyncio.get_event_loop().run_forever()
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
