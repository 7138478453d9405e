"""schemathesis hooks for the contract suite.

An `Idempotency-Key` must be unique per request: the same key with another body is
refused (`422`, as the IETF draft on the header says), and no schema can say "unique
across requests". So in a positive test case a valid generated key gets a random
suffix before it is sent; negative cases (and invalid keys) are sent as generated.
"""

import re
import uuid

import schemathesis

VALID = re.compile(r"^[ \t]*[!-~]+[ \t]*$")


@schemathesis.hook
def before_call(context, case, kwargs):
    meta = getattr(case, "meta", None)
    if meta is not None and meta.generation.mode.is_negative:
        return
    headers = case.headers
    key = headers.get("Idempotency-Key") if headers else None
    if isinstance(key, str) and VALID.match(key) and len(key.strip()) <= 200:
        headers["Idempotency-Key"] = f"{key.strip()}-{uuid.uuid4().hex}"
