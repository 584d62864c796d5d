"""vmcast's wire format and reassembly state machine, with no I/O at all (docs/PROTOCOL.md).

The codec (`frames`) turns bytes into frames and back; `metadata` parses and builds what a stream announces
about its image; `assembly` is the receiver's state machine; `carousel` is the sender's schedule.
"""

from .assembly import (
    Assembly,
    AssemblyState,
    BlockCorrupt,
    BlockVerified,
    Checkpoint,
    DataReceived,
    Duplicate,
    ImageCorrupt,
    ImageVerified,
    MetadataReceived,
    StreamFailed,
)
from .carousel import METADATA_INTERVAL, Carousel, Idle, SendData, SendMetadata
from .repair import (
    REPAIR_REQUEST_OFFSET,
    RepairPlanner,
    RepairQueue,
    RepairRequest,
    decode_repair_request,
    encode_repair_request,
    encode_repair_requests,
)
from .errors import LocalProtocolError, MetadataConflict, ProtocolError, RemoteProtocolError
from .frames import (
    COOKIE_SIZE,
    HEADER,
    HEADER_SIZE,
    MAX_DATAGRAM,
    METADATA_OFFSET,
    DataFrame,
    Dropped,
    DropReason,
    MetadataFrame,
    decode,
    encode_data,
    encode_header,
    encode_metadata,
)
from .metadata import (
    METADATA_PAYLOAD_LIMIT,
    PROTOCOL_VERSION,
    Layout,
    Manifest,
    ManifestBuilder,
    StreamMetadata,
    default_block_size,
    manifest_of,
    parse_metadata,
)

__all__ = [name for name in dir() if not name.startswith("_")]
