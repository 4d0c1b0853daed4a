"""A real SMTP server for the tests (aiosmtpd): every message it receives is
written to <dir>/<n>.eml. Usage: smtp_sink.py PORT DIR [FAIL_RATE]. With a
FAIL_RATE (0..1) it answers that share of messages with a temporary failure
(451) and counts them in <dir>/rejected. Prints READY when listening."""
import asyncio
import itertools
import pathlib
import random
import sys

from aiosmtpd.controller import Controller


class Sink:
    def __init__(self, folder: pathlib.Path, fail_rate: float):
        self.folder = folder
        self.counter = itertools.count(1)
        self.fail_rate = fail_rate
        self.rejected = 0

    async def handle_DATA(self, server, session, envelope):
        if self.fail_rate and random.random() < self.fail_rate:
            self.rejected += 1
            (self.folder / "rejected").write_text(str(self.rejected))
            return "451 4.3.0 try again later"
        name = self.folder / f"{next(self.counter):06d}.eml"
        tmp = name.with_suffix(".tmp")
        header = "X-Envelope-To: " + ", ".join(envelope.rcpt_tos) + "\r\n"
        tmp.write_bytes(header.encode() + envelope.content)
        tmp.rename(name)
        return "250 OK"


def main():
    port, folder = int(sys.argv[1]), pathlib.Path(sys.argv[2])
    fail_rate = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    folder.mkdir(parents=True, exist_ok=True)
    controller = Controller(Sink(folder, fail_rate), hostname="127.0.0.1", port=port)
    controller.start()
    print("READY", flush=True)
    try:
        asyncio.get_event_loop().run_forever()
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
