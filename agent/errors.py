"""Errors of the edge agent.

    AgentError        base of the errors below: the operator can fix them
      ConfigError     the configuration is invalid: the message names the field path
                      (e.g. `http.port`), the bad value, what is allowed, and where the value
                      came from (the TOML file, an EDGEGLM_ environment variable, a command-line
                      override, a desired-config update). A running agent keeps its old config.
      ServeError      the local HTTP API cannot start: the address is taken or not allowed; the
                      message names host and port and the setting to change

All are user errors: the CLI prints the message and exits with code 2.
"""


class AgentError(Exception):
    """An error the operator can act on."""


class ConfigError(AgentError):
    pass


class ServeError(AgentError):
    pass
