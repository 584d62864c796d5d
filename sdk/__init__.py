"""Policy shared by every place vmcast calls a cloud SDK (openstacksdk, boto3): the server's sources and the
receiver's registrations. It imports neither SDK, so either side may use it without pulling in the other's
code or a cloud's library: `translation` (an SDK's exceptions come out as the caller's own domain errors,
never chained to the SDK's).
"""
