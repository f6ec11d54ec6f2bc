"""Compile a checked reading spec into one plain Python function, once, when the definition loads.

Why generate code: a vendor decoder runs per reading on the hub's hot path, and the target is to stay within
a few times of the bare JSON parse. A generic interpreter that walks the spec per value costs a function
call per field; the generated loop reads each value with a dict lookup or a tuple index, folds constant
factors into one multiplication, and computes what depends only on the message (a user property, the unit
the payload states) once per message. The source is kept on the function (``__source__``) for reading.

The generated function applies the same rules as ``hubd.formats.check_reading`` (and the same messages), so
a vendor reading is judged exactly as a native one; tests hold the two to the same results.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import Any, Protocol

from hubd.decode.native import KNOWN_IDS, derive_reactive_power, valid_id
from hubd.decode.registry import Limits
from hubd.decode.vendor.language import Factor, Number, ReadingSpec, Source, TimeSpec
from hubd.decode.vendor.times import _epoch, _local, _rfc3339, _slow_time, hour_table, hourly, show
from hubd.model import MAX_TIME_MS, MIN_TIME_MS, QUANTITIES, ErrorCode, HubError, Reading, out_of_range

RecordFunction = Callable[[Any, Any, dict[str, str], Limits], list[Reading | HubError]]


class Access(Protocol):
    """What differs between payload kinds: how a source is read, and how the records are walked."""

    raw: str  # what a fetched value is: "json" (any JSON value), "text" (a CSV cell), "number" (binary, EPC)

    def message_level(self, source: Source) -> bool:
        """True when the value is the same for every record of a message (computed once)."""
        ...

    def fetch(self, gen: Gen, source: Source, var: str) -> None:
        """Emit ``var = <the raw value>``, None when the payload does not have it."""
        ...

    def loop(self, gen: Gen) -> AbstractContextManager[None]:
        """Emit the loop over the records; the body goes inside."""
        ...

    def check_record(self, gen: Gen) -> None:
        """Emit the check that the record can be read (inside the per-record ``try``)."""
        ...

    def location(self) -> str:
        """A Python expression naming the current record, for messages."""
        ...


class Gen:
    """Lines of Python with indentation, and the constants they refer to."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 1
        self.ns: dict[str, Any] = dict(_RUNTIME)
        self._count = 0

    def line(self, code: str) -> None:
        self.lines.append("    " * self.depth + code)

    def const(self, value: Any, hint: str = "k") -> str:
        self._count += 1
        name = f"{hint}_{self._count}"
        self.ns[name] = value
        return name

    def local(self, hint: str) -> str:
        self._count += 1
        return f"{hint}{self._count}"

    @contextmanager
    def block(self, header: str) -> Iterator[None]:
        self.line(header)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


def compile_reading(spec: ReadingSpec, access: Access, name: str) -> RecordFunction:
    """The record loop for ``spec``: ``fn(src, aux, props, limits) -> items``."""
    gen = Gen()
    parts = _Parts(gen, spec, access)
    gen.line("now = limits.now_ms")
    gen.line("horizon = now + limits.max_future_ms")
    gen.line(f"if horizon >= {MAX_TIME_MS}: horizon = {MAX_TIME_MS - 1}")
    gen.line("items = []")
    gen.line("append = items.append")
    parts.preamble()
    with access.loop(gen):
        gen.line("d = d_msg" if parts.der_id_per_message else "d = None")
        with gen.block("try:"):
            access.check_record(gen)
            parts.record()
        with gen.block("except HubError as exc:"):
            gen.line("exc.der_id = d")
            gen.line(f"exc.message = {access.location()} + ': ' + exc.message")
            gen.line("append(exc)")
    with gen.block("if len(items) > limits.max_readings:"):
        gen.line("raise _too_many(len(items), limits)")
    gen.line("return items")
    source = "def decode(src, aux, props, limits):\n" + "\n".join(gen.lines) + "\n"
    namespace = dict(gen.ns)
    exec(compile(source, f"<format {name}>", "exec"), namespace)
    function: RecordFunction = namespace["decode"]
    function.__source__ = source  # type: ignore[attr-defined]
    return function


class _Parts:
    """Emits each part of a reading: in the preamble when it depends only on the message, else per record."""

    def __init__(self, gen: Gen, spec: ReadingSpec, access: Access) -> None:
        self.gen = gen
        self.spec = spec
        self.access = access
        # Factors of per-record values that depend only on the message (the unit a payload states once):
        # computed once in the preamble, by id of the Factor.
        self._message_factors: list[tuple[Factor, str]] = []
        self._factor_vars: dict[int, str] = {}
        # In the order check_reading judges them: der_id, password, measured_at, the quantities.
        self.parts: list[tuple[str, Callable[[], None], bool]] = [
            ("d", self._der_id, self._level(spec.der_id.source)),
            ("pw", self._password, spec.password.template is None and self._level(spec.password)),
            ("t", lambda: self._time(spec.measured_at), self._level(spec.measured_at.source)),
        ]
        for name, number in spec.quantities.items():
            var = "q_" + name

            per_message = self._level(*_number_sources(number))

            def emit(var: str = var, number: Number = number, name: str = name, once: bool = per_message) -> None:
                # Once in the preamble (kept in values per record), or per record in the shortest form that fits.
                if once or not self._simple_json(number, var, name):
                    self._number(number, var, name)
                    self._in_range(var, name)

            self.parts.append((var, emit, per_message))
            if not per_message:
                self._message_factors.extend((factor, name) for factor in _number_factors(number))
        self.der_id_per_message = self.parts[0][2]

    def _level(self, *sources: Source | None) -> bool:
        return all(s is None or self.access.message_level(s) for s in sources)

    def preamble(self) -> None:
        """What depends only on the message, once; its first refusal (in the native order) is ``msg_e``."""
        gen = self.gen
        gen.line("msg_e = None")
        for var, emit, per_message in self.parts:
            if not per_message:
                continue
            with gen.block("try:"):
                emit()
            with gen.block("except HubError as exc:"):
                gen.line(f"{var} = None")
                with gen.block("if msg_e is None:"):
                    gen.line("msg_e = exc")
        if self.der_id_per_message:
            gen.line("d_msg = d")
        for factor, name in self._message_factors:
            if not self.access.message_level(factor.source):
                continue
            var = gen.local("fm")
            raw = gen.local("f")
            spec = gen.const(factor, "factor")
            label = gen.const(factor.source.label, "label")
            self.access.fetch(gen, factor.source, raw)
            with gen.block("try:"):
                gen.line(f"{var}_m, {var}_d = _ratio(_factor({raw}, {spec}, {label}, {name!r}))")
                gen.line(f"{var}_e = None")
            with gen.block("except HubError as exc:"):
                gen.line(f"{var}_m = {var}_d = None")
                gen.line(f"{var}_e = exc")
            self._factor_vars[id(factor)] = var

    def record(self) -> None:
        gen = self.gen
        checked = False
        for _, emit, per_message in self.parts:
            if per_message:
                if not checked:  # where the first of them would be judged
                    with gen.block("if msg_e is not None:"):
                        gen.line("raise HubError(msg_e.code, msg_e.message)")
                    checked = True
            else:
                emit()
        self._values()
        if "power_kw" in self.spec.quantities and "power_factor" in self.spec.quantities:
            gen.line("derive_reactive_power(values)")
        gen.line("append(Reading(d, t, values, pw))")

    def _values(self) -> None:
        """``values``, in the order check_reading keeps: one dict display when every value is there (the common
        case), else only those that are; a record whose values are all 'not available' gives no reading."""
        gen = self.gen
        names = [name for name in self.spec.quantities if name != "interval_s"]
        interval = "energy_interval_kwh" in self.spec.quantities
        shown = [*names, "interval_s"] if interval else names
        if len(shown) == 1:
            with gen.block(f"if q_{shown[0]} is None:"):
                gen.line("continue  # 'not available': no reading")
            gen.line(f"values = {{{shown[0]!r}: q_{shown[0]}}}")
            return
        test = " and ".join(f"q_{name} is not None" for name in shown)
        with gen.block(f"if {test}:"):
            gen.line("values = {" + ", ".join(f"{name!r}: q_{name}" for name in shown) + "}")
        with gen.block("else:"):
            gen.line("values = {}")
            for name in names:
                with gen.block(f"if q_{name} is not None:"):
                    gen.line(f"values[{name!r}] = q_{name}")
            if interval:
                # The length of an interval whose energy is not available is dropped with it.
                with gen.block("if q_energy_interval_kwh is not None:"):
                    with gen.block("if q_interval_s is None:"):
                        gen.line("raise HubError(BAD, 'energy_interval_kwh and interval_s go together')")
                    gen.line("values['interval_s'] = q_interval_s")
            with gen.block("if not values:"):
                gen.line("continue  # every value 'not available': no reading")

    # -- the parts ------------------------------------------------------------------------------------------------

    def _der_id(self) -> None:
        gen, spec = self.gen, self.spec.der_id
        label = gen.const(spec.source.label, "label")
        self.access.fetch(gen, spec.source, "v")
        if spec.source.kind not in ("property", "const"):  # a user property is text already
            with gen.block("if v.__class__ is int:"):
                gen.line("v = str(v)")
            with gen.block("elif v.__class__ is bytes:"):
                gen.line(f"v = _text(v, 'der_id', {label})")
        if spec.map is not None:
            table = gen.const(dict(spec.map), "der_map")
            where = gen.const(spec.map_name, "map_name")
            gen.line(f"m = {table}.get(v) if v.__class__ is str else None")
            with gen.block("if m is None:"):
                gen.line(f"raise HubError(UNKNOWN_DER, _unmapped(v, {label}, {where}))")
            gen.line("v = m")
        with gen.block("if v.__class__ is not str or (v not in KNOWN_IDS and not _valid_id(v)):"):
            gen.line(f"raise HubError(BAD, 'der_id is missing or not a valid DER id (' + {label} + ')')")
        gen.line("d = v")

    def _password(self) -> None:
        gen, source = self.gen, self.spec.password
        label = gen.const(source.label, "label")
        if source.template is not None:
            prefix, suffix = source.template
            gen.line(f"v = props.get({prefix!r} + d + {suffix!r}) if d is not None else None")
        else:
            self.access.fetch(gen, source, "v")
        if source.kind == "field":  # a binary text field
            with gen.block("if v.__class__ is bytes:"):
                gen.line(f"v = _text(v, 'password', {label})")
        with gen.block("if v.__class__ is not str or not v:"):
            gen.line(f"raise HubError(BAD, 'password is missing or not a string (' + {label} + ')')")
        gen.line("pw = v")

    def _time(self, spec: TimeSpec) -> None:
        gen = self.gen
        if spec.source is None:
            gen.line("t = now")
            return
        label = gen.const(spec.source.label, "label")
        self.access.fetch(gen, spec.source, "v")
        # The common type first (an epoch number, a text), then a missing time, then anything else the long way.
        if spec.kind in ("epoch_s", "epoch_ms"):
            per_unit = 1000 if spec.kind == "epoch_s" else 1
            test, fast = "v.__class__ is int", ["t = v * 1000" if per_unit == 1000 else "t = v"]
            slow = f"t = _epoch(v, {per_unit}, {label})"
        else:
            test = "v.__class__ is str"
            slow = f"t = {'_rfc3339' if spec.kind == 'rfc3339' else '_local'}(v, {label}, None, None)"
            table = hour_table(_slow_time(spec), spec.format, spec.zone) if spec.kind == "local" else None
            if table is None:
                fast = [f"t = {gen.const(hourly(_slow_time(spec), spec.format), 'time')}(v)"]
            else:  # the text's hour plus its minutes and seconds: two lookups (see HourTable)
                hours, tails = gen.const(table.hours.get, "hours"), gen.const(table.tails.get, "tails")
                parse = gen.const(table.parse, "time")
                fast = [
                    f"t = {hours}(v[:{table.cut}])",
                    f"ms = {tails}(v[{table.cut}:])",
                    f"t = {parse}(v) if t is None or ms is None else t + ms",
                ]
        shift = [f"t += {spec.shift_ms}"] if spec.shift_ms else []
        with gen.block(f"if {test}:"):
            for line in fast + shift:
                gen.line(line)
        with gen.block("elif v is None:"):
            if spec.default_now:
                gen.line("t = now")
            else:
                gen.line(f"raise HubError(BAD, 'measured_at is missing (' + {label} + ')')")
        with gen.block("else:"):
            for line in [slow, *shift]:
                gen.line(line)
        with gen.block(f"if not {MIN_TIME_MS} <= t <= horizon:"):
            gen.line("raise HubError(BAD, _bad_time(t, limits))")

    def _number(self, number: Number, var: str, name: str) -> None:
        """Emit ``var = <the value in the unified unit>``, or None when it is not available."""
        gen, access = self.gen, self.access
        raw = gen.local("v")
        label = gen.const(number.source.label, "label")
        what = gen.const(name, "name")
        access.fetch(gen, number.source, raw)
        sentinels = gen.const(number.sentinels, "sentinels") if number.sentinels else None
        if access.raw == "json":
            with gen.block(f"if {raw}.__class__ is not float and {raw}.__class__ is not int and {raw} is not None:"):
                if sentinels:
                    with gen.block(f"if {raw}.__class__ is str and {raw} in {sentinels}:"):
                        gen.line(f"{raw} = None")
                    with gen.block("else:"):
                        gen.line(f"raise HubError(BAD, _not_a_number({what}, {label}, {raw}))")
                else:
                    gen.line(f"raise HubError(BAD, _not_a_number({what}, {label}, {raw}))")
            if sentinels:
                with gen.block(f"if {raw} in {sentinels}:"):
                    gen.line(f"{raw} = None")
        elif access.raw == "text":
            with gen.block(f"if {raw} is not None:"):
                if sentinels:
                    with gen.block(f"if {raw} in {sentinels}:"):
                        gen.line(f"{raw} = None")
                with gen.block("else:" if sentinels else "if True:"):
                    with gen.block("try:"):
                        gen.line(f"{raw} = float({raw})")
                    with gen.block("except ValueError:"):
                        gen.line(f"raise HubError(BAD, _not_a_number({what}, {label}, {raw})) from None")
                    if sentinels:
                        with gen.block(f"if {raw} in {sentinels}:"):
                            gen.line(f"{raw} = None")
        elif sentinels:
            with gen.block(f"if {raw} in {sentinels}:"):
                gen.line(f"{raw} = None")
        if number.valid is not None:
            lo, hi = gen.const(number.valid[0], "vlo"), gen.const(number.valid[1], "vhi")
            with gen.block(f"if {raw} is not None and not {lo} <= {raw} <= {hi}:"):
                gen.line(f"{raw} = None  # outside the valid range: not available")
        with gen.block(f"if {raw} is None:"):
            gen.line(f"{var} = None")
        with gen.block("else:"):
            if number.factor == 1.0 and number.factors and id(number.factors[0]) in self._factor_vars:
                gen.line(f"{var} = {raw}")  # the factor the message states makes it a float
            else:
                gen.line(f"{var} = {raw} {_scaled(number.factor)}")
            for factor in number.factors:
                self._factor(factor, var, what)
            if number.minus is not None:
                other = gen.local("m")
                self._number(number.minus, other, name)
                with gen.block(f"if {other} is None:"):
                    gen.line(f"{var} = None  # one side 'not available': so is the difference")
                with gen.block("else:"):
                    gen.line(f"{var} = {var} - {other}")

    def _in_range(self, var: str, name: str) -> None:
        """The native rule: finite and within the quantity's bounds."""
        with self.gen.block(f"if {var} is not None:"):
            self._check(var, name)

    def _check(self, var: str, name: str) -> None:
        """One chained comparison: false for a value outside the bounds, and for NaN and ±inf (1e999 is inf)."""
        low, high = QUANTITIES[name]
        above = f"{float(low)!r} <=" if low is not None else "-1e999 <"
        below = f"<= {float(high)!r}" if high is not None else "< 1e999"
        with self.gen.block(f"if not {above} {var} {below}:"):
            self.gen.line(f"raise HubError(BAD, _bad_number({name!r}, {var}))")

    def _simple_json(self, number: Number, var: str, name: str) -> bool:
        """The common cases in their shortest form: a JSON number, or a binary field (never missing), with a
        constant factor, and for a field its sentinels and valid range."""
        if number.source.kind in ("field", "epc") and not number.minus:
            return self._simple_field(number, var, name)
        once = [self._factor_vars.get(id(factor)) for factor in number.factors]
        if self.access.raw != "json" or number.sentinels or number.valid or None in once or number.minus:
            return False
        gen = self.gen
        raw = gen.local("v")
        label = gen.const(number.source.label, "label")
        gen.line(f"{var} = None")
        self.access.fetch(gen, number.source, raw)
        # A factor the message states (a unit) is known by now; one that failed refuses each value.
        scaled = f"{raw} {_scaled(number.factor)}" if not once or number.factor != 1.0 else raw
        scaled += "".join(f" * {factor}_m / {factor}_d" for factor in once)
        # A JSON integer is below 2**64 (the parsers make bigger ones floats), so times a constant factor it is
        # finite, and only bounds, if the quantity has any, are checked. A float may be NaN or ±inf.
        exact = not once and abs(number.factor) <= 1e250 and QUANTITIES[name] == (None, None)
        branches = (
            [f"{raw}.__class__ is int", f"{raw}.__class__ is float"]
            if exact
            else [f"{raw}.__class__ is float or {raw}.__class__ is int"]
        )
        for index, test in enumerate(branches):
            with gen.block(("if " if index == 0 else "elif ") + test + ":"):
                for factor in once:
                    with gen.block(f"if {factor}_e is not None:"):
                        gen.line(f"raise HubError(BAD, {factor}_e.message)")
                gen.line(f"{var} = {scaled}")
                if not (exact and index == 0):
                    self._check(var, name)
        with gen.block(f"elif {raw} is not None:"):
            gen.line(f"raise HubError(BAD, _not_a_number({name!r}, {label}, {raw}))")
        return True

    def _simple_field(self, number: Number, var: str, name: str) -> bool:
        gen = self.gen
        raw = gen.local("v")
        gen.line(f"{var} = None")
        self.access.fetch(gen, number.source, raw)
        tests = [f"{raw} is not None"] if number.source.kind == "epc" else []  # a field is never missing
        if number.sentinels:
            tests.append(f"{raw} not in {gen.const(number.sentinels, 'sentinels')}")
        if number.valid is not None:
            tests.append(f"{number.valid[0]!r} <= {raw} <= {number.valid[1]!r}")
        with gen.block(f"if {' and '.join(tests) or 'True'}:"):
            gen.line(f"{var} = {raw} {_scaled(number.factor)}")
            for factor in number.factors:
                self._factor(factor, var, gen.const(name, "name"))
            self._check(var, name)
        return True

    def _factor(self, factor: Factor, var: str, what: str) -> None:
        gen = self.gen
        once = self._factor_vars.get(id(factor))
        if once is not None:
            with gen.block(f"if {once}_e is not None:"):
                gen.line(f"raise HubError(BAD, {once}_e.message)")
            gen.line(f"{var} = {var} * {once}_m / {once}_d")
            return
        raw = gen.local("f")
        spec = gen.const(factor, "factor")
        label = gen.const(factor.source.label, "label")
        self.access.fetch(gen, factor.source, raw)
        # Factors below 1 divide (x * 1 / 10 is x / 10, exact to the last bit; x * 0.1 is not).
        slow = f"_ratio(_factor({raw}, {spec}, {label}, {what}))"
        if factor.table is not None and self.access.raw == "number":  # a unit code: one lookup
            table = gen.const({key: _ratio(value) for key, value in factor.table.items()}, "table")
            gen.line(f"{raw} = {table}.get({raw}) or {slow}")
        elif factor.pow10 and factor.valid is None and self.access.raw == "number":
            gen.line(f"{raw} = _POW10.get({raw}) or {slow}")
        elif not factor.pow10 and factor.table is None and self.access.raw == "number":
            test = f"{raw}.__class__ is int"
            if factor.valid is not None:
                test += f" and {factor.valid[0]!r} <= {raw} <= {factor.valid[1]!r}"
            gen.line(f"{var} = {var} * ({raw} if {test} else _factor({raw}, {spec}, {label}, {what}))")
            return
        else:
            gen.line(f"{raw} = {slow}")
        gen.line(f"{var} = {var} * {raw}[0] / {raw}[1]")


def _scaled(factor: float) -> str:
    """``* factor``, or ``/ divisor`` when the factor is 1/n: 830 / 1000 is 0.83, 830 * 0.001 is 0.8300000000000001."""
    if factor != 0:
        divisor = 1 / factor
        if abs(divisor) > 1 and abs(divisor - round(divisor)) < 1e-9 * abs(divisor):
            return f"/ {float(round(divisor))!r}"
    return f"* {factor!r}"


def _number_factors(number: Number) -> list[Factor]:
    factors = list(number.factors)
    if number.minus is not None:
        factors += _number_factors(number.minus)
    return factors


def _number_sources(number: Number) -> list[Source]:
    sources = [number.source, *(f.source for f in number.factors)]
    if number.minus is not None:
        sources += _number_sources(number.minus)
    return sources


# -- what the generated code calls ------------------------------------------------------------------------------------

BAD = ErrorCode.BAD_REQUEST


def _not_a_number(name: str, label: str, value: Any) -> str:
    return f"{name}: {label} is {show(value)}, not a number"


def _bad_number(name: str, value: float) -> str:
    """The messages of check_reading, for a value out of range or not finite."""
    if not math.isfinite(value):
        return f"{name} must be a finite number"
    return out_of_range(name, value)


def _unmapped(value: Any, label: str, where: str) -> str:
    if value is None:
        return f"der_id: {label} is missing"
    return f"der_id: {label} {show(value)} is not in {where}"


def _bad_time(t: int, limits: Limits) -> str:
    """The message of check_reading (and parse_time) for a time outside the years 1000-9998 or in the future."""
    if not MIN_TIME_MS <= t < MAX_TIME_MS:
        return "measured_at is out of range: the hub takes the years 1000 to 9998"
    return f"measured_at is more than {limits.max_future_ms // 1000} s in the future; check the sender's clock"


def _too_many(count: int, limits: Limits) -> HubError:
    return HubError(ErrorCode.TOO_LARGE, f"{count} readings in one message; the limit is {limits.max_readings}")


def _seoj(frame: bytes) -> str:
    """Where an ECHONET Lite reading comes from, for messages: its SEOJ (class and instance)."""
    return f"SEOJ 0x{frame[4]:02X}{frame[5]:02X}{frame[6]:02X}"


def _text(value: bytes, what: str, label: str) -> str:
    try:
        return value.rstrip(b"\x00 ").decode("ascii")
    except UnicodeDecodeError:
        raise HubError(BAD, f"{what}: {label} is not ASCII text") from None


def _factor(raw: Any, factor: Factor, label: str, name: str) -> float:
    """One factor from the payload: the value, its row in the table, or 10 to its power."""
    if raw is None:
        if factor.default is None:
            raise HubError(BAD, f"{name}: its scale {label} is missing")
        return factor.default
    if factor.table is not None:
        found = factor.table.get(raw.strip() if raw.__class__ is str else raw) if raw.__class__ in SCALARS else None
        if found is None:
            raise HubError(BAD, f"{name}: {label} {show(raw)} is not one of {', '.join(map(str, factor.table))}")
        return found
    if raw.__class__ is str:
        with suppress(ValueError):
            raw = float(raw)
    if (raw.__class__ is not int and raw.__class__ is not float) or not math.isfinite(raw):
        raise HubError(BAD, f"{name}: its scale {label} is {show(raw)}, not a number")
    if factor.valid is not None and not factor.valid[0] <= raw <= factor.valid[1]:
        if factor.default is None:
            raise HubError(BAD, f"{name}: its scale {label} {show(raw)} is outside {list(factor.valid)}")
        return factor.default
    if factor.pow10:
        if not -30 <= raw <= 30 or raw != int(raw):
            raise HubError(BAD, f"{name}: its scale {label} {show(raw)} is no power of ten the hub takes")
        return float(10.0 ** int(raw))
    return float(raw)


SCALARS = frozenset({int, float, str})


def _ratio(factor: float) -> tuple[float, float]:
    """A factor as (multiplier, divisor): 0.1 is (1, 10), so that 123456 x 0.1 is 12345.6, not 12345.600000000002."""
    if factor != 0:
        divisor = 1 / factor
        if abs(divisor) > 1 and abs(divisor - round(divisor)) < 1e-9 * abs(divisor):
            return 1.0, float(round(divisor))
    return float(factor), 1.0


_POW10 = {exponent: _ratio(10.0**exponent) for exponent in range(-30, 31)}
_RUNTIME: dict[str, Any] = {
    "HubError": HubError,
    "Reading": Reading,
    "BAD": BAD,
    "DECODE": ErrorCode.DECODE_ERROR,
    "UNKNOWN_DER": ErrorCode.UNKNOWN_DER,
    "KNOWN_IDS": KNOWN_IDS,
    "_valid_id": valid_id,
    "SCALARS": SCALARS,
    "_POW10": _POW10,
    "_ratio": _ratio,
    "derive_reactive_power": derive_reactive_power,
    "_bad_number": _bad_number,
    "_not_a_number": _not_a_number,
    "_unmapped": _unmapped,
    "_bad_time": _bad_time,
    "_too_many": _too_many,
    "_text": _text,
    "_seoj": _seoj,
    "_epoch": _epoch,
    "_rfc3339": _rfc3339,
    "_local": _local,
    "_factor": _factor,
}
