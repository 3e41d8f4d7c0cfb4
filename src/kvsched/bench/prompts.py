"""The built-in chat prompts of `kvsched bench offline` and `benchmarks/engine_throughput.py`.

Varied lengths on purpose; every third conversation carries the same long system prompt, so the
prefix cache has something to reuse.
"""

from __future__ import annotations

SHARED_SYSTEM_PROMPT = (
    "You are a patient assistant for a small public library. Answer in plain English, in at most a few "
    "short sentences. The library opens from nine in the morning to six in the evening on weekdays and "
    "from ten to four on Saturdays; it is closed on Sundays and public holidays. Members may borrow up to "
    "eight books and four films at a time, for three weeks; a loan may be renewed twice unless another "
    "member has reserved the item. Late returns cost ten cents a day per item, capped at five dollars. "
    "The reading room on the first floor is silent; group study rooms on the second floor can be booked "
    "for two hours a day at the front desk or on the website. Printing costs ten cents a page in black "
    "and white and fifty cents in colour. Children under twelve must be accompanied by an adult after "
    "four in the afternoon. If you do not know an answer, say so and suggest asking a librarian."
)

_LIBRARY_QUESTIONS = (
    "Can I borrow ten books at once?",
    "What time do you close on Saturday?",
    "How much is the fine for a film returned five days late?",
    "Can I renew a book that someone else has reserved?",
    "Where can I study quietly?",
    "How do I book a group study room?",
    "How much does it cost to print twenty colour pages?",
    "Can my ten-year-old come alone at five in the afternoon?",
    "Are you open on Sunday?",
    "How long can I keep a film?",
    "What is the largest fine I can get for one book?",
    "Do you have a place where my study group can talk?",
    "Can I renew a loan three times?",
    "Is the library open on public holidays?",
    "How many films may I borrow?",
    "Do you sell coffee in the reading room?",
    "What happens if I return a book a week late?",
    "Can I book a study room for the whole day?",
    "How early can I arrive on a Tuesday?",
    "Can I print in colour?",
    "Who should I ask about rare manuscripts?",
)

_GENERAL_QUESTIONS = (
    "What is the capital of France? Answer in one sentence.",
    "Explain what a hash table is to a new programmer.",
    "Write a haiku about autumn rain.",
    "Give three tips for keeping a houseplant alive.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What is the difference between weather and climate?",
    "Write a short, friendly email declining a meeting invitation.",
    "How does a bicycle stay upright while moving?",
    "List four fruits that are rich in vitamin C.",
    "What does a compiler do?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Describe the water cycle for a ten-year-old.",
    "Suggest a name for a bakery that sells only bread.",
    "What are the rules of tic-tac-toe?",
    "Why do cats purr?",
    "Give me a simple recipe for pancakes.",
    "Explain recursion with an everyday example.",
    "What is photosynthesis?",
    "Write a limerick about a forgetful robot.",
    "How many continents are there, and what are they?",
    "What is the Pythagorean theorem?",
    "Tell me a fun fact about octopuses.",
    "How should I prepare for a job interview?",
    "What is the boiling point of water at sea level?",
    "Explain the difference between a list and a tuple in Python.",
    "Write two sentences that start a mystery story.",
    "What causes the seasons on Earth?",
    "Why is exercise good for the brain?",
    "How do vaccines train the immune system?",
    "Give me three ideas for a rainy Sunday afternoon.",
    "What is the speed of light, roughly?",
    "Describe a sunset over the sea in one paragraph.",
    "What is the main job of the heart?",
    "How do I make a paper aeroplane that flies far?",
    "What is a prime number? Give examples.",
    "Why do leaves change colour in autumn?",
    "Write a motivational sentence for a student before exams.",
    "What is inflation in economics?",
    "How does a refrigerator keep food cold?",
    "Name three famous painters and one work by each.",
    "What is the tallest mountain in the world?",
    "Explain what an API is in simple terms.",
)


def chat_conversations(num: int = 64) -> list[list[dict[str, str]]]:
    """``num`` conversations; cycles through the built-in set when more are asked for."""
    pool: list[list[dict[str, str]]] = []
    lib = iter(_LIBRARY_QUESTIONS)
    gen = iter(_GENERAL_QUESTIONS)
    for i in range(len(_LIBRARY_QUESTIONS) + len(_GENERAL_QUESTIONS)):
        question = next(lib, None) if i % 3 == 0 else next(gen, None)
        if question is None:
            question = next(gen, None) or next(lib)
        if question in _LIBRARY_QUESTIONS:
            pool.append(
                [{"role": "system", "content": SHARED_SYSTEM_PROMPT}, {"role": "user", "content": question}]
            )
        else:
            pool.append([{"role": "user", "content": question}])
    return [pool[i % len(pool)] for i in range(num)]
