"""Errors of the edge agent.

    AgentError        base of the errors below: the operator can fix them
      ConfigError     the configuration is invalid: the message names the field path
                      (e.g. `http.port`), the bad value, what is allowed, and where the value
                      came from (the TOML file, an EDGEGLM_ environment variable, a command-line
                      override, a desired-config update). A running agent keeps its old config.
      ServeError      the local HTTP API cannot start: the address is taken or not allowed; the
                      message names host and port and the setting to change
      PayloadError    a message received over MQTT is not a valid payload for its topic (not
                      JSON, a wrong field type, too large): the message names the topic and
                      the problem; the session drops the message, counts it and carries on

All are user errors: the CLI prints the message and exits with code 2. PayloadError never gets
that far: the MQTT session reports it as an event and keeps running.
"""


class AgentError(Exception):
    """An error the operator can act on."""


class ConfigError(AgentError):
    pass


class ServeError(AgentError):
    pass


class PayloadError(AgentError):
    """A received MQTT payload that does not fit its topic's model; the sender can fix it."""

    def __init__(self, topic: str, problem: str):
        super().__init__(f"payload on {topic!r} rejected: {problem}")
        self.topic = topic
        self.problem = problem
