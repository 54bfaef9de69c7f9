"""Hypothesis strategies for every PostgreSQL message class, shared by round-trip and fuzz tests."""

from __future__ import annotations

from hypothesis import strategies as st

from endpoint_proxy.protocol.pg import messages as m

# Text that survives encode/decode exactly: no NUL (a C string ends there), no surrogates.
text = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=16)
nonempty_text = text.filter(bool)
data = st.binary(max_size=32)
i16 = st.integers(-(2**15), 2**15 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
u32 = st.integers(0, 2**32 - 1)
u8 = st.integers(0, 255)
value = st.none() | data
kind = st.sampled_from("SP")
field_codes = st.characters(min_codepoint=1, max_codepoint=255)
fields = st.dictionaries(field_codes, text, max_size=6)


def tuples(elements: st.SearchStrategy[object], max_size: int = 6) -> st.SearchStrategy[tuple[object, ...]]:
    return st.lists(elements, max_size=max_size).map(tuple)


backend_messages: dict[type[m.Message], st.SearchStrategy[m.Message]] = {
    m.AuthenticationOk: st.just(m.AuthenticationOk()),
    m.AuthenticationCleartextPassword: st.just(m.AuthenticationCleartextPassword()),
    m.AuthenticationMD5Password: st.builds(m.AuthenticationMD5Password, st.binary(min_size=4, max_size=4)),
    m.AuthenticationSASL: st.builds(m.AuthenticationSASL, tuples(nonempty_text, 3)),
    m.AuthenticationSASLContinue: st.builds(m.AuthenticationSASLContinue, data),
    m.AuthenticationSASLFinal: st.builds(m.AuthenticationSASLFinal, data),
    m.AuthenticationOther: st.builds(m.AuthenticationOther, st.sampled_from(sorted(m.AUTH_OTHER_CODES)), data),
    m.BackendKeyData: st.builds(m.BackendKeyData, u32, u32),
    m.BindComplete: st.just(m.BindComplete()),
    m.CloseComplete: st.just(m.CloseComplete()),
    m.CommandComplete: st.builds(m.CommandComplete, text),
    m.CopyData: st.builds(m.CopyData, data),
    m.CopyDone: st.just(m.CopyDone()),
    m.CopyInResponse: st.builds(m.CopyInResponse, u8, tuples(i16)),
    m.CopyOutResponse: st.builds(m.CopyOutResponse, u8, tuples(i16)),
    m.CopyBothResponse: st.builds(m.CopyBothResponse, u8, tuples(i16)),
    m.DataRow: st.builds(m.DataRow, tuples(value)),
    m.EmptyQueryResponse: st.just(m.EmptyQueryResponse()),
    m.ErrorResponse: st.builds(m.ErrorResponse, fields),
    m.NoticeResponse: st.builds(m.NoticeResponse, fields),
    m.FunctionCallResponse: st.builds(m.FunctionCallResponse, value),
    m.NegotiateProtocolVersion: st.builds(m.NegotiateProtocolVersion, i32, tuples(text)),
    m.NoData: st.just(m.NoData()),
    m.NotificationResponse: st.builds(m.NotificationResponse, u32, text, text),
    m.ParameterDescription: st.builds(m.ParameterDescription, tuples(u32)),
    m.ParameterStatus: st.builds(m.ParameterStatus, text, text),
    m.ParseComplete: st.just(m.ParseComplete()),
    m.PortalSuspended: st.just(m.PortalSuspended()),
    m.ReadyForQuery: st.builds(m.ReadyForQuery, st.sampled_from("ITE")),
    m.RowDescription: st.builds(
        m.RowDescription,
        tuples(st.builds(m.Field, text, u32, i16, u32, i16, i32, i16), 4),
    ),
}

frontend_messages: dict[type[m.Message], st.SearchStrategy[m.Message]] = {
    m.Bind: st.builds(m.Bind, text, text, tuples(i16), tuples(value), tuples(i16)),
    m.Close: st.builds(m.Close, kind, text),
    m.CopyData: st.builds(m.CopyData, data),
    m.CopyDone: st.just(m.CopyDone()),
    m.CopyFail: st.builds(m.CopyFail, text),
    m.Describe: st.builds(m.Describe, kind, text),
    m.Execute: st.builds(m.Execute, text, i32),
    m.Flush: st.just(m.Flush()),
    m.FunctionCall: st.builds(m.FunctionCall, u32, tuples(i16), tuples(value), i16),
    m.Parse: st.builds(m.Parse, text, text, tuples(u32)),
    m.PasswordPacket: st.builds(m.PasswordPacket, data),
    m.Query: st.builds(m.Query, text),
    m.Sync: st.just(m.Sync()),
    m.Terminate: st.just(m.Terminate()),
}

any_backend = st.one_of(*backend_messages.values())
any_frontend = st.one_of(*frontend_messages.values())
