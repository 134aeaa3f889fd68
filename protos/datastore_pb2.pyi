from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_NONE: _ClassVar[Source]
    SOURCE_DATASTORE: _ClassVar[Source]
    SOURCE_DOCUMENTS: _ClassVar[Source]
    SOURCE_RECYCLED: _ClassVar[Source]
    SOURCE_CONTEXT: _ClassVar[Source]
    SOURCE_DRAFT_MODEL: _ClassVar[Source]
    SOURCE_EARLY_EXIT: _ClassVar[Source]
SOURCE_NONE: Source
SOURCE_DATASTORE: Source
SOURCE_DOCUMENTS: Source
SOURCE_RECYCLED: Source
SOURCE_CONTEXT: Source
SOURCE_DRAFT_MODEL: Source
SOURCE_EARLY_EXIT: Source

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("index_id", "tokenizer_fingerprint", "vocab_size", "num_tokens", "num_documents", "manifest_json", "max_context", "max_budget", "max_batch", "documents_available", "session_ttl_s", "server_version")
    INDEX_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_S_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    index_id: str
    tokenizer_fingerprint: str
    vocab_size: int
    num_tokens: int
    num_documents: int
    manifest_json: str
    max_context: int
    max_budget: int
    max_batch: int
    documents_available: bool
    session_ttl_s: float
    server_version: str
    def __init__(self, index_id: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., num_tokens: _Optional[int] = ..., num_documents: _Optional[int] = ..., manifest_json: _Optional[str] = ..., max_context: _Optional[int] = ..., max_budget: _Optional[int] = ..., max_batch: _Optional[int] = ..., documents_available: _Optional[bool] = ..., session_ttl_s: _Optional[float] = ..., server_version: _Optional[str] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("prompt_text", "prompt_ids", "top_k", "tokenizer_fingerprint", "memory", "skip_documents")
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    SKIP_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    prompt_text: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    top_k: int
    tokenizer_fingerprint: str
    memory: bool
    skip_documents: bool
    def __init__(self, prompt_text: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., top_k: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., memory: _Optional[bool] = ..., skip_documents: _Optional[bool] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "document_ids", "ttl_s", "index_id", "memory")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    INDEX_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    document_ids: _containers.RepeatedScalarFieldContainer[int]
    ttl_s: float
    index_id: str
    memory: bool
    def __init__(self, session_id: _Optional[str] = ..., document_ids: _Optional[_Iterable[int]] = ..., ttl_s: _Optional[float] = ..., index_id: _Optional[str] = ..., memory: _Optional[bool] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("closed",)
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    closed: bool
    def __init__(self, closed: _Optional[bool] = ...) -> None: ...

class RetrieveOptions(_message.Message):
    __slots__ = ("max_span", "min_span", "max_matches", "depth", "min_prob")
    MAX_SPAN_FIELD_NUMBER: _ClassVar[int]
    MIN_SPAN_FIELD_NUMBER: _ClassVar[int]
    MAX_MATCHES_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    MIN_PROB_FIELD_NUMBER: _ClassVar[int]
    max_span: int
    min_span: int
    max_matches: int
    depth: int
    min_prob: float
    def __init__(self, max_span: _Optional[int] = ..., min_span: _Optional[int] = ..., max_matches: _Optional[int] = ..., depth: _Optional[int] = ..., min_prob: _Optional[float] = ...) -> None: ...

class RetrieveRequest(_message.Message):
    __slots__ = ("context", "session_id", "budget", "hint_tokens", "hint_probs", "tokenizer_fingerprint", "options", "context_end", "seq", "sent_us")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    HINT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HINT_PROBS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_END_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SENT_US_FIELD_NUMBER: _ClassVar[int]
    context: _containers.RepeatedScalarFieldContainer[int]
    session_id: str
    budget: int
    hint_tokens: _containers.RepeatedScalarFieldContainer[int]
    hint_probs: _containers.RepeatedScalarFieldContainer[float]
    tokenizer_fingerprint: str
    options: RetrieveOptions
    context_end: int
    seq: int
    sent_us: int
    def __init__(self, context: _Optional[_Iterable[int]] = ..., session_id: _Optional[str] = ..., budget: _Optional[int] = ..., hint_tokens: _Optional[_Iterable[int]] = ..., hint_probs: _Optional[_Iterable[float]] = ..., tokenizer_fingerprint: _Optional[str] = ..., options: _Optional[_Union[RetrieveOptions, _Mapping]] = ..., context_end: _Optional[int] = ..., seq: _Optional[int] = ..., sent_us: _Optional[int] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("tokens", "parents", "probs", "sources", "index_id", "match_len", "seq")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    INDEX_ID_FIELD_NUMBER: _ClassVar[int]
    MATCH_LEN_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    sources: bytes
    index_id: str
    match_len: int
    seq: int
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ..., sources: _Optional[bytes] = ..., index_id: _Optional[str] = ..., match_len: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class RetrieveBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RetrieveRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[RetrieveRequest, _Mapping]]] = ...) -> None: ...

class RetrieveBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[RetrieveResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[RetrieveResponse, _Mapping]]] = ...) -> None: ...

class TopkRow(_message.Message):
    __slots__ = ("token", "next_tokens", "probs")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    token: int
    next_tokens: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token: _Optional[int] = ..., next_tokens: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class TokenRun(_message.Message):
    __slots__ = ("tokens", "new_from")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_FROM_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    new_from: int
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., new_from: _Optional[int] = ...) -> None: ...

class Output(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class PushStatsRequest(_message.Message):
    __slots__ = ("batch_id", "rows", "runs", "tokenizer_fingerprint", "outputs")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    rows: _containers.RepeatedCompositeFieldContainer[TopkRow]
    runs: _containers.RepeatedCompositeFieldContainer[TokenRun]
    tokenizer_fingerprint: str
    outputs: _containers.RepeatedCompositeFieldContainer[Output]
    def __init__(self, batch_id: _Optional[str] = ..., rows: _Optional[_Iterable[_Union[TopkRow, _Mapping]]] = ..., runs: _Optional[_Iterable[_Union[TokenRun, _Mapping]]] = ..., tokenizer_fingerprint: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[Output, _Mapping]]] = ...) -> None: ...

class PushStatsResponse(_message.Message):
    __slots__ = ("applied", "version")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    version: int
    def __init__(self, applied: _Optional[bool] = ..., version: _Optional[int] = ...) -> None: ...

class PullStatsRequest(_message.Message):
    __slots__ = ("since_version", "max_rows", "tokenizer_fingerprint")
    SINCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    since_version: int
    max_rows: int
    tokenizer_fingerprint: str
    def __init__(self, since_version: _Optional[int] = ..., max_rows: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ...) -> None: ...

class PullStatsResponse(_message.Message):
    __slots__ = ("rows", "version", "more")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[TopkRow]
    version: int
    more: bool
    def __init__(self, rows: _Optional[_Iterable[_Union[TopkRow, _Mapping]]] = ..., version: _Optional[int] = ..., more: _Optional[bool] = ...) -> None: ...
