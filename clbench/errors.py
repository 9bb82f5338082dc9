class UserError(Exception):
    """Bad input the user can fix (unknown name, invalid value, missing data).

    The CLI prints its message as one line and exits with code 2, without a traceback.
    """


def describe_validation_error(error) -> str:
    """A pydantic ValidationError as one line: 'field: problem; field: problem'."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in error.errors())
