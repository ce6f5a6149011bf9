"""The agent runtime: a tool-calling loop over a longkv server, with sandboxed code execution.

    from longkv.agent import Agent, tool

    @tool
    def word_count(ctx, path: str) -> str:
        \"\"\"Count the words of a file.

        Args:
            path: file path relative to the workdir.
        \"\"\"
        return str(len(ctx.path(path).read_text().split()))

    with Agent(server="http://127.0.0.1:8000/v1", workdir="repo", tools=[word_count]) as agent:
        result = agent.run("How many words does README.md have? Write the number to answer.txt.")
    print(result.status, result.answer)

See docs/agent.md.
"""

from longkv.agent.agent import Agent, RunResult
from longkv.agent.toolkit import Tool, ToolContext, ToolError, tool

__all__ = ["Agent", "RunResult", "Tool", "ToolContext", "ToolError", "tool"]
