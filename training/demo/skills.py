"""Skill experts with answers a program can check: generators of prompts, reference replies and gold
answers, and the graders (deterministic, no downloads).

Five skills the 135M base does poorly and a rank-16 LoRA can learn from a few hundred examples, each
answered in a short, regular form (a line of working, then a marked result):
  arithmetic  one-step word problems (+, -, x)           "23 - 8 = 15. The answer is 15."
  units       unit conversions (metric, time, feet)      "... so 7 km = 7 x 1000 = 7000 m. The answer is 7000."
  weekday     weekday arithmetic, forwards and back      "Counting 3 days forward from Tuesday: Wednesday (1),
                                                         Thursday (2), Friday (3). The answer is Friday."
  extract     name, date and amount of a sentence, as JSON in a given shape (ISO date, number)
  sql         SQLite over one fixed table (employees), checked by running it

Every skill has two disjoint pools of phrasings (and of names, items and cities where a pool is
large enough): `split="train"` draws from one, `split="heldout"` from the other, so a held-out
prompt is never a training template with other numbers. The graders are lenient in the same way
for every model (the base included): a number is the marked one, else the last in the reply; a
weekday the last one named; JSON the first object; SQL the first statement, code fence or not.
"""
from __future__ import annotations

import json
import random
import re
import sqlite3
from dataclasses import dataclass

SKILLS = ("arithmetic", "units", "weekday", "extract", "sql")
DESCRIPTIONS = {
    "arithmetic": "Solves short arithmetic word problems (adding, taking away, multiplying) and ends with "
                  "'The answer is N.'",
    "units": "Converts quantities between units (kilometres, metres, grams, litres, hours, minutes, feet...) "
             "and ends with 'The answer is N.'",
    "weekday": "Works out the day of the week a number of days before or after a given weekday.",
    "extract": "Extracts the person's name, the date and the amount from a sentence into JSON "
               "{\"name\", \"date\" (YYYY-MM-DD), \"amount\"}.",
    "sql": "Writes an SQLite query over the employees table (id, name, department, salary, hire_year, city).",
}


@dataclass(frozen=True)
class Item:
    skill: str
    prompt: str
    answer: str  # the reference reply, what an expert is trained to write
    gold: object  # what the grader compares with: an int, a weekday, a dict, or the gold SQL


# ---- shared pools -------------------------------------------------------------------------

NAMES = {
    "train": ["Tom", "Mia", "Liam", "Emma", "Noah", "Olivia", "Lucas", "Ava", "Ethan", "Sophia", "Leo", "Grace",
              "Omar", "Chloe", "Ravi", "Hannah", "Jack", "Zoe", "Sam", "Lily", "Ben", "Nina", "Carlos", "Ella"],
    "heldout": ["Priya", "Mateo", "Aisha", "Felix", "Yuki", "Isaac", "Freya", "Diego", "Amara", "Hugo", "Mei",
                "Kofi"],
}
SURNAMES = {
    "train": ["Smith", "Garcia", "Brown", "Lee", "Martin", "Walker", "Khan", "Rossi", "Novak", "Dubois", "Silva",
              "Murphy", "Chen", "Kowalski", "Jensen", "Baker", "Turner", "Moreau"],
    "heldout": ["Okafor", "Lindqvist", "Tanaka", "Haddad", "Fischer", "Alvarez", "Nakamura", "Oyelaran"],
}
ITEMS = {
    "train": ["apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells", "cards", "coins",
              "balloons", "eggs", "oranges", "toy cars", "beads", "flowers"],
    "heldout": ["tickets", "cupcakes", "bottles", "crayons", "plums", "ribbons", "buttons", "chairs"],
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve"]


def _pronoun(name: str) -> str:
    she = {"Mia", "Emma", "Olivia", "Ava", "Sophia", "Grace", "Chloe", "Hannah", "Zoe", "Lily", "Nina", "Ella",
           "Priya", "Aisha", "Yuki", "Freya", "Amara", "Mei"}
    return "she" if name in she else "he"


# ---- arithmetic ---------------------------------------------------------------------------

ARITHMETIC = {
    "train": {
        "+": ["{n} has {a} {x}. {P} gets {b} more. How many {x} does {p} have now?",
              "{n} had {a} {x} and bought {b} more. How many {x} does {n} have?",
              "There are {a} {x} in a box and {b} {x} on the table. How many {x} are there altogether?",
              "{n} collected {a} {x} on Monday and {b} on Tuesday. How many {x} did {p} collect in all?",
              "A basket holds {a} {x}. Someone adds {b} more. How many {x} are in the basket?",
              "What is the total if {n} has {a} {x} and finds {b} more?"],
        "-": ["{n} has {a} {x}. {P} gives {b} away. How many {x} are left?",
              "{n} had {a} {x} and lost {b} of them. How many {x} does {p} have now?",
              "There were {a} {x} in a jar. {n} took out {b}. How many {x} are still in the jar?",
              "{n} baked {a} {x} and the family ate {b}. How many {x} remain?",
              "A shop had {a} {x} and sold {b}. How many {x} does the shop have left?"],
        "*": ["{n} has {a} bags with {b} {x} in each bag. How many {x} does {p} have?",
              "There are {a} boxes and each box holds {b} {x}. How many {x} are there in total?",
              "{n} buys {a} packs of {x}. Each pack has {b}. How many {x} did {p} buy?",
              "Each of {a} children has {b} {x}. How many {x} do they have together?"],
    },
    "heldout": {
        "+": ["Over two days a stall sold {a} {x} and then {b} {x}. What was the total sold?",
              "{n} counted {a} {x} in one room and {b} in another. Altogether, how many {x} were counted?",
              "If you start with {a} {x} and someone hands you {b} more, how many {x} do you end up with?"],
        "-": ["{n} started the week with {a} {x} and used up {b}. What is left?",
              "Out of {a} {x}, {b} were broken. How many {x} were not broken?",
              "A class needed {a} {x} but only {b} arrived. How many {x} are still missing?"],
        "*": ["A parking lot has {a} rows with {b} {x} in every row. How many {x} are there?",
              "{n} saves {b} {x} every week for {a} weeks. How many {x} is that?"],
    },
}
OP_WORDS = {"+": "+", "-": "-", "*": "x"}


def arithmetic(rng: random.Random, split: str) -> Item:
    op = rng.choice(["+", "+", "-", "-", "*"])
    if op == "+":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        c = a + b
    elif op == "-":
        a = rng.randint(10, 99)
        b = rng.randint(1, a - 1)
        c = a - b
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        c = a * b
    name = rng.choice(NAMES[split])
    p = _pronoun(name)
    prompt = rng.choice(ARITHMETIC[split][op]).format(n=name, a=a, b=b, x=rng.choice(ITEMS[split]), p=p,
                                                      P=p.capitalize())
    return Item("arithmetic", prompt, f"{a} {OP_WORDS[op]} {b} = {c}. The answer is {c}.", c)


# ---- units --------------------------------------------------------------------------------

# (big unit names, small unit names, factor, big-side quantity range)
CONVERSIONS = [
    (("kilometers", "km", "kilometres"), ("meters", "m", "metres"), 1000, (2, 30)),
    (("meters", "m", "metres"), ("centimeters", "cm", "centimetres"), 100, (2, 50)),
    (("centimeters", "cm"), ("millimeters", "mm"), 10, (2, 99)),
    (("kilograms", "kg"), ("grams", "g"), 1000, (2, 30)),
    (("liters", "L", "litres"), ("milliliters", "mL", "millilitres"), 1000, (2, 20)),
    (("hours",), ("minutes",), 60, (2, 12)),
    (("minutes",), ("seconds",), 60, (2, 12)),
    (("days",), ("hours",), 24, (2, 10)),
    (("weeks",), ("days",), 7, (2, 12)),
    (("feet",), ("inches",), 12, (2, 12)),
    (("dollars",), ("cents",), 100, (2, 50)),
]
UNITS = {
    "train": {
        "down": ["How many {s} are in {q} {b}?", "Convert {q} {b} to {s}.", "What is {q} {b} in {s}?",
                 "{q} {b} is how many {s}?", "How many {s} make {q} {b}?", "Change {q} {b} into {s}."],
        "up": ["How many {b} are in {q} {s}?", "Convert {q} {s} to {b}.", "What is {q} {s} in {b}?",
               "{q} {s} is how many {b}?"],
    },
    "heldout": {
        "down": ["Express {q} {b} in {s}.", "I measured {q} {b}. What is that in {s}?",
                 "Please give {q} {b} as {s}."],
        "up": ["Express {q} {s} in {b}.", "I have {q} {s}. How many {b} is that?"],
    },
}


def _singular(unit: str) -> str:
    return {"feet": "foot", "inches": "inch"}.get(unit, unit[:-1] if unit.endswith("s") and len(unit) > 3 else unit)


def units(rng: random.Random, split: str) -> Item:
    bigs, smalls, factor, (low, high) = rng.choice(CONVERSIONS)
    pick = rng.randrange(len(bigs))  # the same spelling for both units ("km" with "m")
    big, small = bigs[pick], smalls[min(pick, len(smalls) - 1)]
    base = rng.randint(low, high)
    if rng.random() < 0.65:
        q, result = base, base * factor
        prompt = rng.choice(UNITS[split]["down"]).format(q=q, b=big, s=small)
        work = f"1 {_singular(big)} = {factor} {small}, so {q} {big} = {q} x {factor} = {result} {small}."
    else:
        q, result = base * factor, base
        prompt = rng.choice(UNITS[split]["up"]).format(q=q, b=big, s=small)
        work = f"1 {_singular(big)} = {factor} {small}, so {q} {small} = {q} / {factor} = {result} {big}."
    return Item("units", prompt, f"{work} The answer is {result}.", result)


# ---- weekday ------------------------------------------------------------------------------

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WEEKDAY = {
    "train": {
        "after": ["Today is {d}. What day of the week will it be in {n} days?",
                  "If today is {d}, what day is it {n} days from now?",
                  "It is {d}. Which day of the week comes {n} days later?",
                  "What day will it be {n} days after {d}?",
                  "{n} days after a {d}, what day of the week is it?"],
        "before": ["Today is {d}. What day of the week was it {n} days ago?",
                   "If today is {d}, what day was it {n} days ago?",
                   "What day of the week was it {n} days before {d}?",
                   "It is {d} today. Which day was it {n} days earlier?"],
    },
    "heldout": {
        "after": ["My trip starts on a {d} and I come back {n} days later. On what weekday do I come back?",
                  "A parcel ships on {d} and takes {n} days. Which day does it arrive?",
                  "Counting forward {n} days from {d}, where do we land?"],
        "before": ["The meeting was {n} days before {d}. What weekday was the meeting?",
                   "Going back {n} days from a {d}, which day of the week is it?"],
    },
}


def weekday(rng: random.Random, split: str) -> Item:
    start, n = rng.randrange(7), rng.randint(2, 30)
    direction = rng.choice(["after", "after", "before"])
    sign = 1 if direction == "after" else -1
    end = DAYS[(start + sign * n) % 7]
    prompt = rng.choice(WEEKDAY[split][direction]).format(d=DAYS[start], n=n)
    weeks, rest = divmod(n, 7)
    # whole weeks first (a small table: n -> weeks and days), then the days left counted one by one, each the
    # next (or previous) weekday: every step is local, which a 135M model can learn. A first version wrote
    # "Tuesday + 5 days = Sunday" in one jump: the expert learnt the form and not the arithmetic.
    lead = f"{n} days is {weeks} week{'s' if weeks > 1 else ''} and {rest} day{'s' if rest != 1 else ''}" if weeks \
        else ""
    if weeks and not rest:
        return Item("weekday", prompt, f"{lead}, so it is {DAYS[start]} again. The answer is {end}.", end)
    steps = ", ".join(f"{DAYS[(start + sign * k) % 7]} ({k})" for k in range(1, rest + 1))
    way = "forward" if sign > 0 else "back"
    count = f"Counting {rest} day{'s' if rest != 1 else ''} {way} from {DAYS[start]}: {steps}."
    text = f"{lead}; whole weeks land on {DAYS[start]} again. {count}" if weeks else count
    return Item("weekday", prompt, f"{text} The answer is {end}.", end)


# ---- extract ------------------------------------------------------------------------------

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
EXTRACT_ASKS = {
    "train": ['Extract the name, date and amount as JSON {{"name": ..., "date": "YYYY-MM-DD", "amount": ...}}: {s}',
              'Return JSON with keys "name", "date" (YYYY-MM-DD) and "amount" (a number) for this sentence: {s}',
              'From the text below, pull out who, when and how much as JSON with "name", "date" (YYYY-MM-DD), '
              '"amount".\n{s}',
              'Give me the name, the date (YYYY-MM-DD) and the amount in this sentence as a JSON object: {s}',
              '{s}\nExtract {{"name", "date" as YYYY-MM-DD, "amount" as a number}} as JSON.'],
    "heldout": ['Parse this into JSON (fields: name, date in ISO format YYYY-MM-DD, amount as a number): {s}',
                'Fill in {{"name": "", "date": "YYYY-MM-DD", "amount": 0}} from: {s}',
                'Sentence: {s}\nOutput a JSON object with the person\'s name, the date (YYYY-MM-DD) and the amount.'],
}
EXTRACT_SENTENCES = {
    "train": ["On {date}, {name} paid {amount} for the conference.",
              "{name} received a refund of {amount} on {date}.",
              "Invoice for {name}: {amount}, due {date}.",
              "{name} donated {amount} to the library on {date}.",
              "On {date} {name} transferred {amount} to a savings account.",
              "The bank charged {name} a fee of {amount} on {date}.",
              "{name} sold the old bike for {amount} on {date}."],
    "heldout": ["A payment of {amount} from {name} cleared on {date}.",
                "{name}'s rent, {amount}, was paid on {date}.",
                "Receipt dated {date}: {name} spent {amount} on groceries."],
}


def _date_text(rng: random.Random, y: int, m: int, d: int) -> str:
    month = MONTHS[m - 1]
    style = rng.randrange(4)
    if style == 0:
        return f"{month} {d}, {y}"
    if style == 1:
        return f"{d} {month} {y}"
    if style == 2:
        return f"{month[:3]} {d}, {y}"
    return f"{y}-{m:02d}-{d:02d}"


def _amount_text(rng: random.Random, amount: float) -> str:
    whole = int(amount)
    cents = round((amount - whole) * 100)
    style = rng.randrange(3)
    if style == 0:
        return f"${whole:,}" + (f".{cents:02d}" if cents else "")
    if style == 1:
        return f"{whole}" + (f".{cents:02d}" if cents else "") + " dollars"
    return f"${whole}" + (f".{cents:02d}" if cents else "")


def extract(rng: random.Random, split: str) -> Item:
    name = f"{rng.choice(NAMES[split])} {rng.choice(SURNAMES[split])}"
    y, m, d = rng.randint(2015, 2026), rng.randint(1, 12), rng.randint(1, 28)
    amount = rng.choice([rng.randint(5, 99), rng.randint(100, 4999), rng.randint(100, 999) + rng.choice([0.5, 0.25,
                                                                                                         0.99])])
    sentence = rng.choice(EXTRACT_SENTENCES[split]).format(name=name, date=_date_text(rng, y, m, d),
                                                           amount=_amount_text(rng, amount))
    gold = {"name": name, "date": f"{y}-{m:02d}-{d:02d}", "amount": amount}
    return Item("extract", rng.choice(EXTRACT_ASKS[split]).format(s=sentence), json.dumps(gold), gold)


# ---- sql ----------------------------------------------------------------------------------

SCHEMA = "employees(id, name, department, salary, hire_year, city)"
DEPARTMENTS = ["Sales", "Engineering", "Marketing", "Finance", "Support"]
CITIES = ["London", "Paris", "Berlin", "Madrid", "Rome"]
EMPLOYEES = [  # fixed rows: the grader runs gold and candidate queries on them
    (i + 1, name, DEPARTMENTS[(i * 3) % 5], 30000 + (i * 7919) % 60000 // 1000 * 1000, 2010 + (i * 7) % 15,
     CITIES[(i * 2 + i // 5) % 5])
    for i, name in enumerate(["Alice", "Bob", "Carla", "Dan", "Eve", "Frank", "Gina", "Hector", "Ines", "Jon",
                              "Kim", "Luis", "Maya", "Nils", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tara",
                              "Uma", "Victor", "Wendy", "Xavier", "Yara", "Zane"])
]
SQL_ASKS = {
    "train": ["Table {schema}.\nWrite an SQLite query: {q}", "Schema: {schema}\nSQL for: {q}",
              "Using the table {schema}, write a SQL query. {q}", "{q}\nTable: {schema}. Answer with SQL only."],
    "heldout": ["Given the SQLite table {schema}, what query answers this? {q}",
                "Database table: {schema}\nQuestion: {q}\nQuery:"],
}
SQL_QUESTIONS = {
    "train": {
        "names_dept": ["List the names of employees in the {dept} department.", "Who works in {dept}?"],
        "count_dept": ["How many employees work in {dept}?", "Count the employees in the {dept} department."],
        "avg_dept": ["What is the average salary in {dept}?", "Average salary of the {dept} department?"],
        "max_dept": ["What is the highest salary in {dept}?"],
        "salary_gt": ["Which employees earn more than {x}?", "Names of employees with a salary above {x}."],
        "hired_after": ["Which employees were hired after {y}?", "List employees hired later than {y}."],
        "names_city": ["Who is based in {city}?", "List the names of employees in {city}."],
        "count_city": ["How many employees are in {city}?"],
        "dept_salary": ["List employees in {dept} earning more than {x}."],
        "sum_dept": ["What is the total salary of {dept}?"],
    },
    "heldout": {
        "names_dept": ["Show everyone from {dept}."],
        "count_dept": ["Number of people in {dept}?"],
        "avg_dept": ["Give the mean pay of {dept} staff."],
        "max_dept": ["Top salary among {dept} employees?"],
        "salary_gt": ["Show the staff paid over {x}."],
        "hired_after": ["Who joined after {y}?"],
        "names_city": ["Which staff members live in {city}?"],
        "count_city": ["Count the staff in {city}."],
        "dept_salary": ["{dept} employees with pay above {x}?"],
        "sum_dept": ["Sum of all salaries in {dept}?"],
    },
}
SQL_GOLD = {
    "names_dept": "SELECT name FROM employees WHERE department = '{dept}';",
    "count_dept": "SELECT COUNT(*) FROM employees WHERE department = '{dept}';",
    "avg_dept": "SELECT AVG(salary) FROM employees WHERE department = '{dept}';",
    "max_dept": "SELECT MAX(salary) FROM employees WHERE department = '{dept}';",
    "salary_gt": "SELECT name FROM employees WHERE salary > {x};",
    "hired_after": "SELECT name FROM employees WHERE hire_year > {y};",
    "names_city": "SELECT name FROM employees WHERE city = '{city}';",
    "count_city": "SELECT COUNT(*) FROM employees WHERE city = '{city}';",
    "dept_salary": "SELECT name FROM employees WHERE department = '{dept}' AND salary > {x};",
    "sum_dept": "SELECT SUM(salary) FROM employees WHERE department = '{dept}';",
}


def sql(rng: random.Random, split: str) -> Item:
    kind = rng.choice(sorted(SQL_GOLD))
    values = {"dept": rng.choice(DEPARTMENTS), "city": rng.choice(CITIES), "x": rng.randrange(40, 85) * 1000,
              "y": rng.randint(2011, 2022)}
    question = rng.choice(SQL_QUESTIONS[split][kind]).format(**values)
    gold = SQL_GOLD[kind].format(**values)
    return Item("sql", rng.choice(SQL_ASKS[split]).format(schema=SCHEMA, q=question), gold, gold)


GENERATORS = {"arithmetic": arithmetic, "units": units, "weekday": weekday, "extract": extract, "sql": sql}


def generate(skill: str, split: str, count: int, seed: int) -> list[Item]:
    """`count` distinct prompts of one skill from one pool of phrasings."""
    rng, seen, out = random.Random(f"{skill}/{split}/{seed}"), set(), []
    for _ in range(count * 50):
        item = GENERATORS[skill](rng, split)
        if item.prompt not in seen:
            seen.add(item.prompt)
            out.append(item)
            if len(out) == count:
                break
    return out


# ---- graders ------------------------------------------------------------------------------

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
MARKED = re.compile(r"answer is:?\s*\**\s*\$?(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
DAY = re.compile(r"\b(" + "|".join(DAYS) + r")\b", re.IGNORECASE)
FENCE = re.compile(r"```(?:sql|sqlite)?\s*(.*?)```", re.IGNORECASE | re.DOTALL)
SELECT = re.compile(r"\bSELECT\b.*?(?:;|$)", re.IGNORECASE | re.DOTALL)


def _number(text: str) -> float | None:
    marked = MARKED.findall(text)
    found = marked[-1] if marked else (NUMBER.findall(text) or [None])[-1]
    if found is None:
        return None
    try:
        return float(found.replace(",", "").rstrip("."))
    except ValueError:
        return None


def _first_json(text: str) -> dict | None:
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            value, _ = decoder.raw_decode(text[start:])
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _as_number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.replace("$", "").replace(",", "").replace("dollars", "").strip())
        except ValueError:
            return None
    return None


def employees_db() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT, department TEXT, salary INTEGER, "
               "hire_year INTEGER, city TEXT)")
    db.executemany("INSERT INTO employees VALUES (?, ?, ?, ?, ?, ?)", EMPLOYEES)
    return db


def _rows(db: sqlite3.Connection, query: str) -> list | None:
    try:
        rows = db.execute(query).fetchmany(1000)
    except (sqlite3.Error, sqlite3.Warning, ValueError):
        return None
    return sorted(tuple(round(v, 2) if isinstance(v, float) else v for v in row) for row in rows)


def sql_of(text: str) -> str | None:
    """The first SQL statement of a reply: a fenced block's, else from the first SELECT to its ';'."""
    fenced = FENCE.search(text)
    body = fenced.group(1) if fenced else text
    found = SELECT.search(body)
    return found.group(0).strip() if found else None


def grade(skill: str, reply: str, gold) -> bool:
    """Is `reply` right? The same lenient reading for every model (module docstring)."""
    if skill in ("arithmetic", "units"):
        value = _number(reply)
        return value is not None and abs(value - float(gold)) < 1e-6
    if skill == "weekday":
        days = DAY.findall(reply)
        return bool(days) and days[-1].lower() == str(gold).lower()
    if skill == "extract":
        value = _first_json(reply)
        if value is None:
            return False
        amount = _as_number(value.get("amount"))
        return (str(value.get("name", "")).strip() == gold["name"] and str(value.get("date", "")).strip() == gold["date"]
                and amount is not None and abs(amount - float(gold["amount"])) < 1e-6)
    if skill == "sql":
        query = sql_of(reply)
        if query is None:
            return False
        db = employees_db()
        try:
            got, want = _rows(db, query), _rows(db, gold)
        finally:
            db.close()
        return got is not None and got == want
    raise ValueError(f"unknown skill {skill!r}")
