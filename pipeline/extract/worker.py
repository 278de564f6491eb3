"""The extraction child: reads batches of (body, header charset) on stdin, answers one ExtractResult frame per page.

Started by ``pipeline.extract.sandbox`` as ``python -m pipeline.extract.worker``. Its stdout carries frames
only: the original descriptor is kept for them and descriptor 1 is pointed at stderr, so a library that
prints cannot corrupt the stream. It exits when its stdin closes (the parent is gone).
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    frames_out = os.dup(1)
    os.dup2(2, 1)
    from pipeline.extract.frames import read_frame, write_frame
    from pipeline.extract.html import HtmlToText

    settings = read_frame(0)
    if settings is None:
        return 0
    page_to_text = HtmlToText(settings)
    write_frame(frames_out, "ready")
    while True:
        message = read_frame(0)
        if message is None:
            return 0
        for body, header_label in message:  # a batch; one answer frame per page, as each is done
            write_frame(frames_out, page_to_text(body, header_label))


if __name__ == "__main__":
    sys.exit(main())
