"""multipart/form-data bodies (image edits, file uploads), read safely: the parts are counted
before anything is parsed, and parsing runs in a worker thread (8 MB of tiny parts took the event
loop for 23 s)."""

import asyncio
import email.parser
import email.policy
import re
from dataclasses import dataclass, field

from ..errors import ClientError, InvalidParameter, TooLarge

MAX_FORM_PARTS = 64  # a file or two and the couple of dozen fields of an API, with room to spare


@dataclass
class Form:
    fields: dict = field(default_factory=dict)  # typed as the JSON API types them
    files: dict[str, bytes] = field(default_factory=dict)
    filenames: dict[str, str] = field(default_factory=dict)


async def read_form(content_type: str, body: bytes, ints: frozenset[str] | set[str] = frozenset(),
                    floats: frozenset[str] | set[str] = frozenset()) -> Form:
    """The form's fields (those named in `ints`/`floats` as numbers: clients send every field as
    a string) and files; a 413 past MAX_FORM_PARTS parts, a 400 for what is not a form."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/form-data") or boundary is None:
        raise ClientError("the body must be multipart/form-data (files and form fields)")
    parts = body.count(b"--" + boundary.group(1).encode("latin-1")) - 1
    if parts > MAX_FORM_PARTS:
        raise TooLarge(f"the form has {parts} parts; at most {MAX_FORM_PARTS} are taken", "body")
    return await asyncio.to_thread(_parse, content_type, body, ints, floats)


def _parse(content_type: str, body: bytes, ints, floats) -> Form:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise ClientError("the multipart body could not be read")
    form = Form()
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            form.files[name], form.filenames[name] = payload, part.get_filename()
            continue
        value = payload.decode("utf-8", errors="replace")
        try:
            form.fields[name] = int(value) if name in ints else float(value) if name in floats else value
        except ValueError:
            raise InvalidParameter(name, f"must be a number, got {value[:40]!r}") from None
    return form
