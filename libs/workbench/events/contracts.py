"""Event payload contracts: the protobuf message in proto/ that declares each event type, and the
check that an envelope's `data` matches the message its `type` names."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import (  # type: ignore[import-untyped, unused-ignore]
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
)
from google.protobuf.descriptor import (  # type: ignore[import-untyped, unused-ignore]
    Descriptor,
    FieldDescriptor,
    FileDescriptor,
)

EVENT_TYPE_OPTION = "wb.events.v1.event_type"
DESCRIPTOR_SET_NAME = "descriptors.binpb"
# Same shape EventEnvelope.type accepts: wb.<service>.<entity>.<past-tense verb>.
_EVENT_TYPE_RE = re.compile(r"^wb\.[a-z_]+\.[a-z_]+\.[a-z_]+$")


class ContractViolation(ValueError):
    """Event data that does not match the contract of its type, or a type no contract declares."""


@dataclass(frozen=True)
class _Contracts:
    pool: descriptor_pool.DescriptorPool  # owns the descriptors below
    files: tuple[FileDescriptor, ...]
    by_type: Mapping[str, Descriptor]
    by_message: Mapping[str, str]  # message full name -> the event type it declares


def descriptor_set_path() -> Path:
    """proto/descriptors.binpb in a checkout, or the top-level `proto/` a wheel installs."""
    here = Path(__file__).resolve()
    candidates = (here.parents[3] / "proto", here.parents[2] / "proto")
    for directory in candidates:
        path = directory / DESCRIPTOR_SET_NAME
        if path.is_file():
            return path
    looked = ", ".join(str(d / DESCRIPTOR_SET_NAME) for d in candidates)
    raise FileNotFoundError(
        f"event contracts not found (looked in {looked}): run `make proto` in the repository"
    )


def _walk(messages: Iterator[Descriptor]) -> Iterator[Descriptor]:
    for message in messages:
        yield message
        yield from _walk(iter(message.nested_types))


@functools.cache
def _contracts() -> _Contracts:
    path = descriptor_set_path()
    file_set = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file_proto in file_set.file:  # --include_imports writes dependencies first
        pool.AddSerializedFile(file_proto.SerializeToString())
    files = tuple(pool.FindFileByName(f.name) for f in file_set.file)

    # GetOptions() parses options with the default pool, where our extension is an unknown
    # field; re-parse them with this pool's own MessageOptions, which knows it.
    extension = pool.FindExtensionByName(EVENT_TYPE_OPTION)
    options_class = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("google.protobuf.MessageOptions")
    )
    by_type: dict[str, Descriptor] = {}
    for file in files:
        for message in _walk(iter(file.message_types_by_name.values())):
            # A class built at runtime from the pool: its extensions are not typed.
            options: Any = options_class.FromString(message.GetOptions().SerializeToString())
            if not options.HasExtension(extension):
                continue
            event_type = str(options.Extensions[extension])
            if not _EVENT_TYPE_RE.match(event_type):
                raise ContractViolation(
                    f"{message.full_name} in {file.name} declares event type {event_type!r}, "
                    "which is not of the form wb.<service>.<entity>.<past-tense verb>"
                )
            if event_type in by_type:
                raise ContractViolation(
                    f"event type {event_type!r} is declared by both "
                    f"{by_type[event_type].full_name} and {message.full_name}: keep one"
                )
            by_type[event_type] = message
    by_message = {message.full_name: event_type for event_type, message in by_type.items()}
    return _Contracts(pool=pool, files=files, by_type=by_type, by_message=by_message)


def known_event_types() -> frozenset[str]:
    return frozenset(_contracts().by_type)


def contract_for(event_type: str) -> Descriptor:
    """The message descriptor that declares `event_type`."""
    try:
        return _contracts().by_type[event_type]
    except KeyError:
        raise ContractViolation(
            f"no contract in proto/ declares event type {event_type!r}: add a message with "
            f'option ({EVENT_TYPE_OPTION}) = "{event_type}" and run `make proto`'
        ) from None


def declared_event_type(message: Descriptor) -> str | None:
    """The event type `message` declares with the custom option, if it declares one."""
    return _contracts().by_message.get(message.full_name)


def descriptor_files() -> tuple[FileDescriptor, ...]:
    """Every file in the descriptor set, dependencies included."""
    return _contracts().files


def validate_event_data(event_type: str, data: dict[str, Any]) -> None:
    """Raise ContractViolation unless `data` is a valid JSON form of the message that declares
    `event_type` (proto field names, no unknown fields, values of the field's type)."""
    message = contract_for(event_type)
    if not isinstance(data, dict):
        raise ContractViolation(
            f"data of {event_type} must be an object, got {type(data).__name__}"
        )
    try:
        _check_field_names(message, data, "data")
        json_format.ParseDict(
            data, message_factory.GetMessageClass(message)(), ignore_unknown_fields=False
        )
    except (ContractViolation, json_format.ParseError) as exc:
        raise ContractViolation(
            f"data of {event_type} does not match {message.full_name}: {exc}"
        ) from None


def _check_field_names(message: Descriptor, data: Mapping[str, Any], where: str) -> None:
    # ParseDict also accepts lowerCamelCase json names; events are consumed as plain dicts, so
    # a payload must use the proto field names consumers read.
    fields = message.fields_by_name
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            expected = ", ".join(fields) or "none"
            raise ContractViolation(
                f"unknown field {key!r} in {where} (fields of {message.name}: {expected})"
            )
        _check_nested(field, value, f"{where}.{key}")


def _check_nested(field: FieldDescriptor, value: Any, where: str) -> None:
    nested = field.message_type
    if nested is None or nested.full_name.startswith("google.protobuf."):
        return  # scalars, and well-known types whose JSON form is not field names
    if nested.GetOptions().map_entry:
        value_field = nested.fields_by_name["value"]
        if isinstance(value, dict):
            for key, item in value.items():
                _check_nested(value_field, item, f"{where}[{key!r}]")
        return
    # Shape only (list or object): FieldDescriptor.label is gone in protobuf 7 and is_repeated
    # is missing before 6.31, and ParseDict reports a repeated/singular mismatch anyway.
    items = value if isinstance(value, list) else [value]
    for index, item in enumerate(items):
        if isinstance(item, dict):
            label = f"{where}[{index}]" if items is value else where
            _check_field_names(nested, item, label)
